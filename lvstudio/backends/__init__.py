"""lvstudio.backends"""
