"""Reference servers the bench measures Chorus against (Mosquitto is started from its own binary)."""
