"""lvstudio.tui"""
