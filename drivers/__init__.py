"""Line hardware, its simulation, and the pure signal detectors."""

import os

# numpy's OpenBLAS starts a worker thread per core that spins between calls; the
# detectors' many small matrix products then cost about twice the CPU
# (docs/PERFORMANCE.md). Each line's detectors run on one thread anyway. This must run
# before numpy is first imported; an operator's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
