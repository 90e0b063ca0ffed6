"""Stage implementations: one module per kind, each exposing run(spec, ctx) -> StageResult."""
