"""Quiescing guests: qemu-guest-agent's protocol and the frozen window around a snapshot."""
