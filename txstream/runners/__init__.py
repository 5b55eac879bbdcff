"""Runner profiles: defaults that make the one graph run well on each runner."""
