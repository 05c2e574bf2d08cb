"""The control socket of ``snapimg serve``: JSON lines over a unix socket (docs/nbd.md).

:mod:`snapimg.control.server` answers requests by calling a
:class:`~snapimg.backends.base.Backend`; :mod:`snapimg.control.client` is what the CLI
(and anyone else) uses to send them.
"""
