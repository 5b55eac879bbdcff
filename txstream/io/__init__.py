"""Wire format, schema registry, sources and sinks."""
