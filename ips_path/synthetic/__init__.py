"""synthetic: see docs/architecture.md."""
