"""firmware/tamper: the kiosk's door switch (docs/VOICE.md, "Tamper switch")."""
