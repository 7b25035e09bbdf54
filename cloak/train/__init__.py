"""Training of the embedded cloak-mini DiffVC (reduced widths, official architecture)."""
