"""Test tooling for snapimg's reliability evidence (not product code).

``reliability.crash``: a power-loss crash-state explorer (records the file-system
calls a workload really issues, builds the crash states POSIX/ext4/XFS allow, reopens
each one and checks it).  ``reliability.fuzz``: fuzzing harnesses for the NBD parsers.
"""
