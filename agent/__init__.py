"""cpupool: a Kubernetes device plugin that turns a node's CPUs into schedulable pools."""

__version__ = "0.1.0"
