"""The FSDP2 training package (filled in below)."""
