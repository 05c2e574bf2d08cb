"""Guest operating systems of the rig."""
