"""What both programs use: configuration kit, atomic files, CLI helpers, the MQTT link, models and data."""
