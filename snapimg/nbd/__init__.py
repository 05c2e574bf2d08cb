"""The NBD protocol in the spec's own names (NetworkBlockDevice/nbd doc/proto.md): the
server (:mod:`snapimg.nbd.server`) serves :class:`~snapimg.blockdev.BlockDevice` exports;
docs/nbd.md describes what it speaks."""
