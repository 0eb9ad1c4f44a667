"""The formats raypipe reads that others define: img2dataset's shards (COYO downloads)."""
