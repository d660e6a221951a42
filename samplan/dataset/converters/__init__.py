"""Converters from published dataset layouts to the nnU-Net v2 raw format: MSD tasks, 2D image/mask folders, DICOM.

Each converter writes into a staging folder beside its target, verifies the result with samplan's own checks
(datasets only) and renames it into place at the end (`common.staged_folder`), so a failed or killed run leaves
nothing half-written.
"""
