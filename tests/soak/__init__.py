"""The long run of issue 14 (bench/soak.py): clients, snapshot lifecycle, backups, models."""
