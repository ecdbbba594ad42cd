"""lvstudio.sampling"""
