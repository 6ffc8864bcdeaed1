"""Every figure, and the slicer widget."""
