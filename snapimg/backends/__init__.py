"""Backends that carry the data behind `snapimg serve`: native (own engine + NBD) and qsd."""
