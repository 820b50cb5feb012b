"""firmware/gps"""
