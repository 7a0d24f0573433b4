"""Users' generations: batch scoring by a reward model, best/worst selection."""
