"""What runs on a compute host: the steps, the simulated hypervisor, and the drain."""
