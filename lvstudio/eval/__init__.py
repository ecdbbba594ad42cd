"""lvstudio.eval"""
