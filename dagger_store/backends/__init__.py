"""The backend seam (base.py) and its implementations: memory, local directory / NFS, S3."""
