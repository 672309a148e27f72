"""The simulated phone line: scenario files, signal synthesis, the ``sim`` backend.

``scenario`` parses scenario files, ``synth`` and ``callerid`` are the pure generators and
encoders, ``backend`` builds the timeline and plays it as a :class:`LineBackend`.
See docs/SIMULATOR.md.
"""
