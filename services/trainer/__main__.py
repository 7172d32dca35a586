from services.common.service import main
from services.trainer.service import TrainerService

raise SystemExit(main(TrainerService))
