"""Performance: the speed-ups of the ``perf`` configuration section and the benchmark suite.

- :mod:`fl2ora.perf.speedups` sets the switches up on a built experiment.
- :mod:`fl2ora.perf.features` caches image features while the image encoder is frozen.
- :mod:`fl2ora.perf.images` keeps decoded and resized images in memory.
- :mod:`fl2ora.perf.suite` is ``fl2ora bench``: throughput, round time, memory and
  each speed-up measured on and off.

This package imports nothing heavy itself, so the command line can read the
benchmark's options without loading torch.
"""
