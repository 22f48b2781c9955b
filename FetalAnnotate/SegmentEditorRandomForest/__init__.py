"""The "Random forest" Segment Editor effect; Slicer loads SegmentEditorEffect.py by path at startup."""
