from services.common.service import main
from services.planner.service import PlannerService

raise SystemExit(main(PlannerService))
