"""What-if variants that `make bench` measures beside the service."""
