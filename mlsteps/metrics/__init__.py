"""Metric implementations (design.md section 4)."""
