"""The named composite PTransforms of the graph, one concept per module."""
