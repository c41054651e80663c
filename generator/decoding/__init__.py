"""Decoding: one Decoder contract, every decoder, and the one registry that names them (see docs/architecture.md)."""
