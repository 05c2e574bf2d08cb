"""The snapimg virtual-hardware rig: real guests under qemu-system-x86_64, driven over QMP.

The rig talks to snapimg only through its command line and NBD, as a user would.
See docs/vmtests.md.
"""
