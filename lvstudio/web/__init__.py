"""lvstudio.web"""
