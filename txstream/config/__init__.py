"""Pipeline options and bundled configuration (rules)."""
