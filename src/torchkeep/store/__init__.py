"""Bytes and durability: atomic files, fsync, checksums, storage back ends, blobs, typed JSON,
and the write side of torchkeep's own folder format. No policy; imports nothing above errors."""
