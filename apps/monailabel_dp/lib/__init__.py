"""The MONAI Label DP app's tasks (MONAI Label puts the app folder on ``sys.path`` and imports ``lib``)."""
