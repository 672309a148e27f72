"""Pure signal detectors (DSP). Streaming, numpy-only, no I/O."""
