"""Hydra configs, installed as a package so that non-editable installs find them."""
