"""What a finished (or running) sweep shows: tables and plots, the HTML report, Grad-CAM, and the
sweep's post-job step (the winner's export, schedule, Grad-CAM task and summary)."""
