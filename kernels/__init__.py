"""Self-contained compute kernels (no imports from paxlike or models).

``platform`` holds what the kernel families share: the ``impl`` names, the Pallas targets and the
choice of code by the platform a program is lowered for."""
