"""Image-caption data sets: image folders with metadata, and the MIMIC-CXR adapter."""
