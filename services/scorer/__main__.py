from services.common.service import main
from services.scorer.service import ScorerService

raise SystemExit(main(ScorerService))
