"""firmware/sos_button"""
