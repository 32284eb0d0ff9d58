"""`make bench`: performance figures of the cpupool agent against the grpcio kubelet emulator."""
