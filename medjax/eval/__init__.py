"""Evaluation metrics: FID/KID with pytorch-fid's Inception (fid.py, inception.py), recon.py."""
