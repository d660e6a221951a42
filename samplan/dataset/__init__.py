"""Raw datasets in the nnU-Net v2 format: dataset.json, case listing, image I/O, verification."""
