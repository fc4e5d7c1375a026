"""The networks of the recipe: VAE, U-Net, text encoder, captioner, latent decoder."""
