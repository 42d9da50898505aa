"""Image sources and the image-to-latent-shard encoder (`python preprocessing/encode.py --help`)."""
