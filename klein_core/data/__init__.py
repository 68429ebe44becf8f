"""The data layer: image decoding, captions (trigger word, dropout), aspect buckets and the batch sampler, dataset
scanning and inspection, the dataset spec a node hands on with its fingerprint, and the latent/text cache.

It never writes into a user's dataset folder.
"""
